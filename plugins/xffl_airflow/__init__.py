"""The Airflow side of xffl-airflow: Slurm hook, operator, trigger and sensor; SFTP transfer;
federation configuration. Installed as a package (``pip install xffl-airflow[airflow]``) so the
triggerer imports it from ``sys.path``; Airflow's ``plugins/`` folder holds the same source."""

__version__ = "0.1.0"
