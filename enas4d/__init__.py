"""ENAS4D: efficient multi-stage CNN architecture search for dynamic inference."""

import os

# OpenMP threads that spin while waiting made 2-thread CPU training 2-10x slower than 1 thread whenever
# another process was busy; passive waiting costs nothing on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
