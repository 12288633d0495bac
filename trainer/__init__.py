"""The bundled ParagonSR2 trainer (`paragon-train`)."""
