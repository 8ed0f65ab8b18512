import sys

from fastasyncore._bench.runner import main

sys.exit(main())
