"""Local test bed for tests and the demo: facilities (Slurm behind sshd) and an Airflow
instance, each started for real and stopped again by PID. Not installed with the package."""
