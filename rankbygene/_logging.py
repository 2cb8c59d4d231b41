"""Package logger: ``logging.getLogger("rankbygene")``, silent unless the user configures it."""

from __future__ import annotations

import logging

logger = logging.getLogger("rankbygene")
