"""What a workflow is: the document model, port types, validation and the run plan.

Pure: no I/O, no database, no HTTP. Everything here can be used to check a workflow file
without a server.
"""
