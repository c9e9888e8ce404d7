"""The registered model as an MLflow pyfunc (the bundle of formats.model_bundle with its plan)."""
