"""The REST API: the FastAPI app factory, routes, problem+json errors, request ids.

Routes translate HTTP to engine and store calls and back; they hold no business rules.
"""
