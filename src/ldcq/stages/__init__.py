"""The three LightningModules; training logic lives only here."""
