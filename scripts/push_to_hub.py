"""Publish a finished output folder: `python scripts/push_to_hub.py OUTPUT --hub_model_id you/name [--private]`."""

from clip_accel.cli import push_main

if __name__ == "__main__":
    push_main()
