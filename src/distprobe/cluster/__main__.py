"""``python -m distprobe.cluster``: ``distprobe submit`` on its own."""

from distprobe.cluster.cli import main

raise SystemExit(main())
