"""``python -m distprobe.launch``: ``distprobe submit`` on its own."""

from distprobe.launch.cli import main

raise SystemExit(main())
