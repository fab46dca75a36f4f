"""The engine process of one deployment: `python -m appliance.engine_process`, started by the web process.

Like every appliance process it imports the `appliance` package first, so the egress guard and the offline
variables are in force before torch or transformers load. Its startup report (the guard's policy and the
offline values this interpreter's libraries read) goes to the web process with the engine's ready message and
becomes the engine process's process.start event. Then it serves the engine on the socketpair end it
inherited (inference.engine.server) and exits when the web process goes away.
"""
import argparse
import json
import logging
import os
import socket
import sys

import appliance  # noqa: F401  (the egress guard and the offline variables, before anything else loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the inherited end of the web process's socketpair")
    parser.add_argument("--name", required=True, help="the variant this process serves")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig's fields as JSON")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
    # Imported here, in this order: Django is set up first, then what needs its settings and the engine.
    import django

    django.setup()  # the guard records what it blocks in the ledger, through Django's database settings
    from audit import egress
    from inference.engine import core  # noqa: F401  (torch and transformers, so the report shows what they read)
    from inference.engine.config import EngineConfig
    from inference.engine.server import serve

    logging.getLogger(__name__).info("engine process %d serving %s", os.getpid(), args.name)
    # The web process records this in the ledger as the engine process's process.start event.
    process = {"pid": os.getpid(), **egress.startup_report()}
    serve(sock, args.model_dir, EngineConfig.from_kwargs(**json.loads(args.config)), process=process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
