"""``python -m mvl_pipeline.predict``: the documented name of the predict command, which lives in
:mod:`mvl_pipeline.commands.predict`."""

from mvl_pipeline.commands.predict import main

if __name__ == "__main__":
    main()
