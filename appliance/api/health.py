"""/health and /ready for load balancers and supervisors; no key needed, and no names given away.

    /health  200 while this process answers at all
    /ready   200 when every deployed variant is loaded in this process, else 503 with the counts
"""
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from appliance import engine_client

from ..models import ModelVariant, VariantStatus


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


@require_GET
def ready(request):
    deployed = set(ModelVariant.objects.filter(status=VariantStatus.DEPLOYED).values_list("name", flat=True))
    loaded = deployed & set(engine_client.names())
    body = {"status": "ready" if loaded == deployed else "loading", "deployed": len(deployed),
            "loaded": len(loaded)}
    return JsonResponse(body, status=200 if loaded == deployed else 503)
