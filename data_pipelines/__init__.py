"""Data sets and input pipelines of jaxdeblur (TFDS array_record builders, grain loaders).

Modules (imported on demand, so that `import data_pipelines` stays cheap):

- `build`: `build_dataset(name, data_dir=..., manual_dir=...)` and the command line
  `python -m data_pipelines.build NAME --data_dir D [--manual_dir M] [--config C]`.
- `paired`: the shared builder base (`PairedImageBuilder`, `DatasetLayoutError`) and the
  record layout; its docstring records what works in TFDS without TensorFlow.
- `gopro`, `hide`, `realblur` (`realblur_j`, `realblur_r`), `kohler`, `lai`, `levin`,
  `paired_folder`: builders reading the authors' distributions from `manual_dir`.
- `synthetic_blur`: the embedded default (scikit-image photographs, known kernel fields),
  `rebuild_kernel_field(example)`.
- `pipeline`: `load_split(name, split, data_dir)` and `make_pipeline(source, ...)`.
"""
