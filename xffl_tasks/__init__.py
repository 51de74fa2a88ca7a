"""What runs at a facility (training) and in the aggregation task.

Depends on torch, transformers and safetensors only: facility nodes have no Airflow, and
nothing here may import it.
"""

__version__ = "0.1.0"
