"""Import and export of public precomputed stores (docs/design.md, "Importing and exporting stores")."""

from pipelines.interchange import datamodels, datamodels_store, edub, trak_scores

# `dmu import KIND SOURCE --run-dir RUN` and `dmu export KIND --run-dir RUN --out DIR`
IMPORTERS = {"datamodels-release": datamodels.import_release, "datamodels-weights": datamodels.import_weights,
             "datamodels-store": datamodels_store.import_store, "trak-scores": trak_scores.import_scores,
             "edub": edub.import_edub}
EXPORTERS = {"datamodels-release": datamodels.export_release, "datamodels-store": datamodels_store.export_store,
             "edub": edub.export_edub}
