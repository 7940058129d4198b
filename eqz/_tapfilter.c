/*
 * The eval-callback front door for eqz's hidden-state taps.
 *
 * llama.cpp's scheduler asks the eval callback about every node of the graph (~900 per token on
 * SmolLM2-135M). Answering those asks in Python costs about 5% of decode speed; answering them here
 * costs nothing measurable. Only the nodes eqz wants, the residual stream `l_out-N` of chosen layers,
 * reach the Python callback, once their data is computed. eqz loads this file with ctypes; it uses
 * no Python API.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define EQZ_MAX_LAYERS 1024

typedef bool (*eqz_answer_fn)(void *tensor, bool ask, void *user_data);

typedef struct {
    eqz_answer_fn answer;                  /* called with ask=false for each wanted node */
    size_t name_offset;                    /* offsetof(struct ggml_tensor, name), given by eqz */
    unsigned char wanted[EQZ_MAX_LAYERS];  /* wanted[N] != 0: deliver l_out-N */
} eqz_tap_filter;

bool eqz_tap_filter_eval(void *tensor, bool ask, void *user_data) {
    eqz_tap_filter *filter = (eqz_tap_filter *)user_data;
    if (!ask) {
        return filter->answer(tensor, false, NULL);
    }
    const char *name = (const char *)tensor + filter->name_offset;
    if (strncmp(name, "l_out-", 6) != 0) {
        return false;
    }
    char *end = NULL;
    long layer = strtol(name + 6, &end, 10);
    return end != name + 6 && *end == '\0' && layer >= 0 && layer < EQZ_MAX_LAYERS && filter->wanted[layer];
}
