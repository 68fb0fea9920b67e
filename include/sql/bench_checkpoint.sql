-- herald bench: flush dirty buffers before a timed measurement (needs superuser or pg_checkpoint).
CHECKPOINT
