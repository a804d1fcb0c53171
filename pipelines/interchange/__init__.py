"""Import and export of public precomputed stores (docs/design.md, "Importing and exporting stores")."""

from pipelines.interchange import datamodels, edub

# `dmu import KIND SOURCE --run-dir RUN` and `dmu export KIND --run-dir RUN --out DIR`
IMPORTERS = {"datamodels-release": datamodels.import_release, "edub": edub.import_edub}
EXPORTERS = {"datamodels-release": datamodels.export_release, "edub": edub.export_edub}
