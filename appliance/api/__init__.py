"""The team API: the OpenAI-compatible endpoints under /v1/ that the company's tools call.

    handler.py     the ASGI handler: which bodies are read at all, then Django's URL routing and SecurityMiddleware
    urls.py        /v1/models, /v1/chat/completions, /v1/openapi.json
    views.py       the endpoints: key, admission, the engine's answer or stream, the ledger event
    schemas.py     the request bodies, validated strictly (pydantic); response_format compiled to a grammar
    fields.py      every field of OpenAI's chat reference: honoured, accepted or refused (a 400 naming it)
    errors.py      errors in OpenAI's JSON shape
    gatekeeper.py  what the API asks of the registry (callers, admission, usage), as a protocol
    admission.py   the registry's answers: keys, access, limits, usage rows
    settlement.py  the database work off the event loop, in bursts: admission, ledger events, usage, transcripts
    openapi.py     the OpenAPI document, built from the request schema

The engines themselves are reached through appliance.engine_client.
"""
