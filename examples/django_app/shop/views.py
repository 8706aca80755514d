from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import klime


@csrf_exempt
@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    """Queue two events and answer at once: track/identify never wait for the network."""
    user_id = request.POST["user_id"]
    plan = request.POST.get("plan", "free")
    klime.identify(user_id, {"plan": plan})
    klime.track("Signup", {"plan": plan}, user_id=user_id)
    return JsonResponse({"ok": True})


async def upgrade(request: HttpRequest) -> JsonResponse:
    """An async view that waits for Klime's answer without blocking the event loop."""
    user_id = request.GET["user_id"]
    response = await klime.get_client().atrack_sync(
        "Plan Upgraded", {"plan": "pro"}, user_id=user_id, timeout=5
    )
    return JsonResponse({"accepted": response.accepted})
