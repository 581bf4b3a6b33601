/* SPDX-License-Identifier: GPL-2.0 */
/* What src/answer.c offers the Rust half; src/lib.rs declares the same in `extern "C"`. */
#ifndef CGLOBAL_ANSWER_H
#define CGLOBAL_ANSWER_H

extern int cglobal_answer;
int *cglobal_answer_ptr(void);

#endif
