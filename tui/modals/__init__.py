"""Modal screens: questions and results that need the user's attention before going on."""
