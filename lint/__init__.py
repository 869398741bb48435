"""``dualwrite lint``: reviews expand and contract migration scripts before they run, with
evidence from the live database, the mappings and the traffic the sidecars recorded."""
