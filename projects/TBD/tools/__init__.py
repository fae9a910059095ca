"""The project's tools (installed as the package ``tbd_tools``): export, verify and model-zoo
table of releases, harmony analysis, visualisation and the demo. Each module is also a script."""
