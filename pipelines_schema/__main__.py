"""Run `python -m pipelines_schema FILE...`, the same as `kubeci validate FILE...`."""

from pipelines_schema.validate import main

raise SystemExit(main())
