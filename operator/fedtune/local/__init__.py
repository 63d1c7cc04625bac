"""Local mode: the same FederatedJob + Party documents on one machine (`fedtune run`)."""
