"""MC-dropout sampling, vote rules, uncertainty maps and mapping back to each scan's geometry."""
