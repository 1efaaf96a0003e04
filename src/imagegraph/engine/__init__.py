"""How workflows run: state transitions in the database, the worker, the node output cache,
retries, events. The engine never speaks HTTP; the API and the CLI drive it through `Engine`.
"""
