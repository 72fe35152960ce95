"""Pipeline parallelism: point-to-point exchange between stages, schedules, and a Chrome trace."""
