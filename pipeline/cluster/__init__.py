"""Ray: the only package that starts Ray, calls `fit` or talks to a Ray cluster. Starting or
joining Ray and running a job to the end (`launch`), the Job Submission API (`jobs`), and the
Serve application started and stopped on Ray (`serving`)."""
