"""Import and export of public precomputed stores (docs/design.md, "Importing and exporting stores")."""

from pipelines.interchange import datamodels

# `dmu import KIND SOURCE --run-dir RUN` and `dmu export KIND --run-dir RUN --out DIR`
IMPORTERS = {"datamodels-release": datamodels.import_release}
EXPORTERS = {"datamodels-release": datamodels.export_release}
