"""Import and export of public precomputed stores (docs/design.md, "Importing and exporting stores")."""

from pipelines.interchange import datamodels, datamodels_store, trak_scores

# `dmu import KIND SOURCE --run-dir RUN` and `dmu export KIND --run-dir RUN --out DIR`
IMPORTERS = {"datamodels-release": datamodels.import_release}
IMPORTERS["datamodels-weights"] = datamodels.import_weights
IMPORTERS["datamodels-store"] = datamodels_store.import_store
IMPORTERS["trak-scores"] = trak_scores.import_scores
EXPORTERS = {"datamodels-release": datamodels.export_release}
EXPORTERS["datamodels-store"] = datamodels_store.export_store
