"""Subprocess helper for test_image: saves a large image in a loop until killed."""
import sys
from pathlib import Path

from a4ps.image import ImageStore

data = Path(sys.argv[1])
store = ImageStore(data / "live_image.dill", data / "snapshots", ring=3)
i = 0
print("ready", flush=True)
while True:
    i += 1
    store.save({"protos": {}, "n": i, "ballast": bytes(8_000_000)})
