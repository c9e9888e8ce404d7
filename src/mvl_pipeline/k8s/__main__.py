"""``python -m mvl_pipeline.k8s``."""

from mvl_pipeline.k8s.cli import main

if __name__ == "__main__":
    main()
