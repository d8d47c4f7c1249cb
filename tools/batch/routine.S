/* The batched-syscall routine (checkpoint/batch.py), x86-64, position
 * independent: no absolute address, no stack, no data of its own.
 *
 * The engine sets the registers and PTRACE_CONTs the thread at the first
 * byte; the routine runs a table of entries and traps back with int3.
 *
 *   rbx  the first entry: 8 quadwords
 *          [0] syscall number (low 32 bits) | flags << 32
 *          [1..6] the six arguments (rdi rsi rdx r10 r8 r9)
 *          [7] the expected result (flag EXPECT)
 *   r12  the number of entries
 *   r13  the results: one quadword per entry
 *   r15  the index of the first entry to run (0)
 *
 * Flags: bit 32 EXPECT: stop unless the result equals [7]; bit 33 ANY: never
 * stop on this entry's result. Otherwise it stops at a result in
 * [-4095, -1] (-errno). Every result is stored before the check.
 *
 * At the trap: r15 = the index reached (the number of entries when all ran,
 * else the entry that stopped the table), rax its result.
 */
	.text
	.globl	batch_start
batch_start:
next_entry:
	cmp	%r12, %r15
	jae	done
	mov	(%rbx), %rbp
	mov	%ebp, %eax		/* the number, zero-extended */
	mov	8(%rbx), %rdi
	mov	16(%rbx), %rsi
	mov	24(%rbx), %rdx
	mov	32(%rbx), %r10
	mov	40(%rbx), %r8
	mov	48(%rbx), %r9
	syscall
	mov	%rax, (%r13,%r15,8)
	bt	$33, %rbp		/* ANY */
	jc	advance
	bt	$32, %rbp		/* EXPECT */
	jnc	check_errno
	cmp	56(%rbx), %rax
	jne	done
	jmp	advance
check_errno:
	cmp	$-4095, %rax
	jae	done
advance:
	add	$64, %rbx
	inc	%r15
	jmp	next_entry
done:
	int3
	.globl	batch_trapped
batch_trapped:
	jmp	done			/* never resumed here: trap again */
