"""Session-wide test settings.

``REFNGD_QUEUE_CHECKS=1`` runs the session with the input checks of NumPy arrays queued
and read together, as they are for CuPy arrays inside a public call
(:func:`refngd.backend.one_host_read`): tests/test_host_reads.py reruns the bad-input
batteries this way, so that the GPU's error behaviour is exercised on every CPU run.
"""
import os

from refngd import backend

if os.environ.get("REFNGD_QUEUE_CHECKS") == "1":
    backend._QUEUE_NUMPY_CHECKS[0] = True
