import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("TANDEM_HYPOTHESIS_EXAMPLES", "400")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, stateful_step_count=40, deadline=None)
settings.load_profile(os.environ.get("TANDEM_HYPOTHESIS_PROFILE", "ci"))
