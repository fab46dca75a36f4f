"""ASGI entry point of the web process: console, chat API and the engine."""
import os

import appliance  # noqa: F401  (sets the offline environment first)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()

from appliance import reconciler  # noqa: E402

reconciler.start()
