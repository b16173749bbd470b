from benchmarks.frontier.cli import main

raise SystemExit(main())
