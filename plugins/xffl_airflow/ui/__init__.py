"""The campaign view: per-round results of a federated campaign inside the Airflow UI."""
