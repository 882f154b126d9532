"""The reproductions' stages and report builders, one module per paper or study: the functions
that ``reproduce.after`` and ``reproduce.report.builder`` of the presets in conf/experiment/ name
(``nodebench reproduce NAME``)."""
