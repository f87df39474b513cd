import os

from hypothesis import HealthCheck, settings

# CI runs more examples; a local run stays quick. Deadlines are off: timing is not behaviour.
settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Tests use tiny tensors: one torch thread is faster (and on a loaded machine far faster) than several.
import torch  # noqa: E402

torch.set_num_threads(1)
