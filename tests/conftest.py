import os

from hypothesis import HealthCheck, settings

# CI runs more examples, derandomized so that a landing is judged on the same examples every time; a local
# run stays quick and explores new random examples; "stress" (HYPOTHESIS_PROFILE=stress) hunts for rare
# failures before they reach CI. Deadlines are off: timing is not behaviour.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=150, derandomize=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("stress", max_examples=1500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

# Tests use tiny tensors: one torch thread is faster (and on a loaded machine far faster) than several.
import torch  # noqa: E402

torch.set_num_threads(1)
