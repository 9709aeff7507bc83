"""`python -m distprobe ...`."""

from distprobe.cli import main

raise SystemExit(main())
