from __future__ import annotations

from flask import Blueprint, request

from klime.integrations.flask import get_client

bp = Blueprint("shop", __name__)


@bp.post("/signup")
def signup() -> dict[str, bool]:
    """Queue two events and answer at once: track/identify never wait for the network."""
    body = request.get_json()
    user_id, plan = body["user_id"], body.get("plan", "free")
    client = get_client()
    client.identify(user_id, {"plan": plan})
    client.track("Signup", {"plan": plan}, user_id=user_id)
    return {"ok": True}


@bp.get("/upgrade")
def upgrade() -> dict[str, int]:
    """Send one event now and answer with what Klime said (blocks this worker meanwhile)."""
    response = get_client().track_sync(
        "Plan Upgraded", {"plan": "pro"}, user_id=request.args["user_id"], timeout=5
    )
    return {"accepted": response.accepted}
