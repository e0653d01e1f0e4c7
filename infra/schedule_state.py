"""Print `true` if a deployment's schedule exists on the Prefect server and is active, else `false`.

    python infra/schedule_state.py btx-pipeline/btx nightly-demo

infra/prefect.yaml runs it as a build step of the pipeline's deployment and gives its output to
the schedule's `active:`. Prefect 3.9.1 sends `active` exactly as prefect.yaml writes it on every
`prefect deploy` (a redeploy updates the schedule of the same slug in place), so a literal
`active: false` re-paused a schedule an operator had turned on, on every deploy (compose's deploy
service runs one on every `up`); leaving `active` out would create the schedule active on a first
deploy. With this step, a first deploy creates it paused and a redeploy keeps what it was.
"""

from __future__ import annotations

import sys


def schedule_active(deployment: str, slug: str) -> bool:
    """Whether `deployment` ("flow/deployment") has an active schedule `slug`; False if either is
    missing. Any other error (the server unreachable) raises: the deploy stops."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return False
    return any(s.slug == slug and s.active for s in found.schedules or [])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} FLOW/DEPLOYMENT SCHEDULE_SLUG")
    print("true" if schedule_active(sys.argv[1], sys.argv[2]) else "false")
