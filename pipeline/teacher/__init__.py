"""Everything that talks to teacher endpoints: the client, its response cache, limits and cost."""
