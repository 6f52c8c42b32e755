"""How good an attention is at a task: multi-query associative recall (MQAR) learned by a small model with each
attention method swapped in (`racebench quality`)."""
