"""Datasets and the input pipeline: the layouts ImageNet users have (`layouts`), the index that
`data prepare` writes and training reads (`prepare`, `index`), DALI pipelines and the loader
(`loader`, `decode`), augmentations on images (`augment`) and on batches (`mix`), tar shards
(`shards`), the synthetic sample dataset (`synth`) and `data preview` (`preview`)."""
