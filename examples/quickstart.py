"""The quick start: identify, group, track, one blocking send, shutdown.

Run it against the local collector with `make demo`, or point KLIME_ENDPOINT and
KLIME_WRITE_KEY at your own Klime workspace.
"""

from datetime import UTC, datetime

import klime

client = klime.Client()  # write key and endpoint from KLIME_WRITE_KEY / KLIME_ENDPOINT

client.identify("user_123", {"email": "user@example.com", "name": "Ada"})
client.group("org_456", {"name": "Acme Inc", "plan": "enterprise"}, user_id="user_123")
client.track("Button Clicked", {"plan": "pro", "button": "upgrade"}, user_id="user_123")
client.track("Events Received", {"count": 100}, group_id="org_456")

# history: the event's own time and id (the same id twice is one event at Klime)
client.track(
    "Order Placed",
    {"total": 42},
    user_id="user_123",
    timestamp=datetime(2026, 3, 1, 12, 30, tzinfo=UTC),
    message_id="order-1001",
)

response = client.track_sync("Signup", {"plan": "pro"}, user_id="user_123")
print(f"track_sync: accepted={response.accepted} failed={response.failed}")

result = client.shutdown(timeout=5)
print(f"shutdown: sent={result.sent} failed={result.failed} unsent={result.unsent}")
print("stats:", client.stats())
