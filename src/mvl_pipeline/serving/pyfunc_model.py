"""The registered pyfunc's model code (MLflow "models from code").

``mlflow.pyfunc.log_model`` is given the path of this file, not a pickled object: the file is
copied into the model, and ``mlflow.pyfunc.load_model`` runs it to get the model. Loading then
unpickles nothing, so it also works where ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is false (a
hardened site), and a registered model never carries code frozen at registration time.
"""

from mlflow.models import set_model

from mvl_pipeline.serving.pyfunc import MedVisionLlamaPyfunc

set_model(MedVisionLlamaPyfunc())
