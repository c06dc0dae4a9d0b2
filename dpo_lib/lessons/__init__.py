"""The tutorial's helpers: the bundled data set, toy problems, the reference quantizer, the
memory estimate, log analysis, comparisons of runs and answers. May import every other wing."""
